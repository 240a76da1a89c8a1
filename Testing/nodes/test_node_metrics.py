"""Detection metrics of LymphNodeStagingLib.nodes.metrics on hand-built masks with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from LymphNodeStagingLib.errors import InputError, UsageError
from LymphNodeStagingLib.nodes.metrics import (
    SIZE_BINS,
    FrocCurve,
    average_recall,
    evaluate_detection,
    fp_at_recall,
    froc,
    match_components,
    object_dice,
    slice_dice,
    voxel_dice,
)

SHAPE = (10, 24, 24)
SPACING = (1.0, 1.0, 1.0)


def box(arr: np.ndarray, z: tuple[int, int], y: tuple[int, int], x: tuple[int, int], value: float) -> None:
    arr[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = value


def test_perfect_match():
    truth = np.zeros(SHAPE, np.int32)
    box(truth, (2, 5), (2, 6), (2, 6), 1)
    box(truth, (5, 8), (12, 18), (12, 18), 7)
    prob = np.where(truth > 0, 0.9, 0.0)
    m = match_components(truth, prob)
    assert m.truth_ids.tolist() == [1, 7]
    assert m.counts(0.5) == (2, 0, 0)
    assert np.allclose(m.truth_hit_dice, 1.0) and np.allclose(m.pred_hit_dice, 1.0)
    rep = evaluate_detection([truth], [prob], SPACING)
    o = rep.overall
    assert o.n_truth == 2 and o.average_recall == pytest.approx(1.0)
    assert o.object_dice == pytest.approx(1.0) and o.voxel_dice == pytest.approx(1.0)
    assert o.slice_dice == pytest.approx(1.0) and o.fp_per_scan_at_80_recall == 0.0
    assert o.froc.fp_per_scan.tolist() == [0.0] and o.froc.sensitivity.tolist() == [1.0]
    json.dumps(rep.to_dict(), allow_nan=False)


def test_missed_node():
    truth = np.zeros(SHAPE, np.int32)
    box(truth, (2, 5), (2, 6), (2, 6), 1)
    box(truth, (5, 8), (12, 18), (12, 18), 2)
    prob = np.where(truth == 1, 0.8, 0.1)
    m = match_components(truth, prob)
    assert m.counts(0.5) == (1, 0, 1)
    assert m.truth_hit_dice.tolist() == [1.0, 0.0] and m.truth_hit_score[1] == -math.inf
    rep = evaluate_detection([truth], [prob], SPACING)
    assert rep.overall.average_recall == pytest.approx(0.5)
    assert rep.overall.object_dice == pytest.approx(0.5)
    assert rep.overall.fp_per_scan_at_80_recall == math.inf
    assert rep.to_dict()["overall"]["fp_per_scan_at_80_recall"] is None


def test_pure_false_positive_and_hand_computed_recall():
    truth = np.zeros(SHAPE, np.int32)
    box(truth, (2, 5), (2, 6), (2, 6), 1)
    prob = np.where(truth > 0, 0.6, 0.0)
    box(prob, (5, 8), (14, 18), (14, 18), 0.95)  # touches no truth: a false positive that outranks the node
    m = match_components(truth, prob)
    assert m.n_pred == 2 and m.pred_hit_dice.tolist() == [1.0, 0.0]
    assert m.counts(0.9) == (0, 1, 1)
    assert m.counts(0.5) == (1, 1, 0)
    curve = froc([m])
    assert curve.thresholds.tolist() == pytest.approx([0.95, 0.6])
    assert curve.fp_per_scan.tolist() == [1.0, 1.0] and curve.sensitivity.tolist() == [0.0, 1.0]
    # recall 0 for x = 0.00 .. 0.99 (100 values), 1 for x = 1.00 .. 5.00 (401 values)
    assert average_recall(curve) == pytest.approx(401 / 501)
    assert fp_at_recall(curve, 0.8) == 1.0
    # A second, empty scan halves the FP per scan.
    empty = match_components(np.zeros(SHAPE, np.int32), np.zeros(SHAPE))
    assert froc([m, empty]).fp_per_scan.tolist() == [0.5, 0.5]
    assert object_dice([m, empty]) == pytest.approx(1.0)  # the scan without truth is skipped


def test_split_component_is_one_tp_and_no_fp():
    truth = np.zeros(SHAPE, np.int32)
    box(truth, (1, 9), (4, 10), (4, 10), 1)
    prob = np.zeros(SHAPE)
    box(prob, (1, 6), (4, 10), (4, 10), 0.8)  # larger piece
    box(prob, (7, 9), (4, 10), (4, 10), 0.9)  # smaller piece, higher score, separated by an empty slice
    m = match_components(truth, prob)
    assert m.n_pred == 2
    assert np.all(m.pred_hit_dice > 0)
    assert m.counts(0.5) == (1, 0, 0)
    assert m.truth_hit_score[0] == pytest.approx(0.8)  # the best (largest-Dice) piece decides the hit-score
    assert m.truth_hit_dice[0] == pytest.approx(2 * 180 / (288 + 180))
    assert m.counts(0.85) == (0, 0, 1)  # the small piece is still no false positive


def test_merged_component_gives_two_tps():
    truth = np.zeros(SHAPE, np.int32)
    box(truth, (2, 6), (4, 8), (4, 8), 1)
    box(truth, (2, 6), (4, 8), (9, 13), 2)
    prob = np.zeros(SHAPE)
    box(prob, (2, 6), (4, 8), (4, 13), 0.7)  # one blob over both nodes and the gap
    m = match_components(truth, prob)
    assert m.n_pred == 1 and m.counts(0.5) == (2, 0, 0)
    assert m.truth_hit_dice.tolist() == pytest.approx([2 * 64 / (64 + 144)] * 2)
    assert m.object_dice() == pytest.approx(2 * 64 / 208)


def test_binary_truth_is_split_into_components():
    truth = np.zeros(SHAPE, bool)
    box(truth, (2, 4), (2, 4), (2, 4), True)
    box(truth, (4, 6), (4, 6), (4, 6), True)  # touches the first one at a corner: 26-connected
    box(truth, (2, 4), (15, 18), (15, 18), True)
    m = match_components(truth, truth.astype(float))
    assert m.n_truth == 2 and m.counts(0.5) == (2, 0, 0)


def test_froc_is_monotone_and_matches_the_strict_rule():
    rng = np.random.default_rng(3)
    scans = []
    for _ in range(3):
        truth = np.zeros(SHAPE, np.int32)
        prob = np.zeros(SHAPE)
        for k in range(1, 7):
            z, y, x = rng.integers(0, 8), rng.integers(0, 20), rng.integers(0, 20)
            if rng.random() < 0.7:
                box(truth, (z, z + 2), (y, y + 3), (x, x + 3), k)
            if rng.random() < 0.7:
                dz, dy = rng.integers(-1, 2, 2)
                box(prob, (z + 1 + dz, z + 3 + dz), (y + dy, y + 3 + dy), (x, x + 2), rng.uniform(0.5, 1.0))
        scans.append(match_components(truth, prob))
    curve = froc(scans)
    assert curve.thresholds.size > 3
    assert np.all(np.diff(curve.thresholds) < 0)
    assert np.all(np.diff(curve.fp_per_scan) >= 0) and np.all(np.diff(curve.sensitivity) >= 0)
    n_truth = sum(s.n_truth for s in scans)
    for thr, fp, sens in zip(curve.thresholds, curve.fp_per_scan, curve.sensitivity, strict=True):
        level = np.nextafter(thr, -np.inf)
        tp_fp = np.array([s.counts(level)[:2] for s in scans]).sum(axis=0)
        assert tp_fp[0] / n_truth == pytest.approx(sens) and tp_fp[1] / len(scans) == pytest.approx(fp)


def test_average_recall_of_a_hand_curve():
    curve = FrocCurve(thresholds=np.array([0.9, 0.8, 0.7]), fp_per_scan=np.array([0.5, 1.0, 2.0]),
                      sensitivity=np.array([0.2, 0.5, 0.6]), n_truth=10, n_scans=2)
    # x < 0.5: 50 values at 0; 0.5 <= x < 1: 50 at 0.2; 1 <= x < 2: 100 at 0.5; 2 <= x <= 5: 301 at 0.6
    assert average_recall(curve) == pytest.approx((50 * 0.2 + 100 * 0.5 + 301 * 0.6) / 501)
    assert average_recall(curve, max_fp=1.0, step=0.5) == pytest.approx((0.0 + 0.2 + 0.5) / 3)
    assert fp_at_recall(curve, 0.5) == 1.0 and fp_at_recall(curve, 0.8) == math.inf
    with pytest.raises(UsageError, match="step"):
        average_recall(curve, step=0)


def test_slice_dice_counts_empty_slices_as_one():
    truth = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    box(truth, (3, 4), (0, 4), (0, 4), 1)  # one slice, 16 voxels
    box(pred, (3, 4), (0, 4), (0, 2), 1)  # half of it
    box(pred, (6, 7), (10, 12), (10, 12), 1)  # a slice with prediction only
    assert slice_dice(truth, pred) == pytest.approx((8 * 1.0 + 2 * 8 / 24 + 0.0) / 10)
    assert voxel_dice(truth, pred) == pytest.approx(2 * 8 / (16 + 12))
    assert math.isnan(voxel_dice(np.zeros(SHAPE), np.zeros(SHAPE)))
    assert slice_dice(np.zeros(SHAPE), np.zeros(SHAPE)) == 1.0


def test_size_bins_given_short_axes():
    truth = np.zeros(SHAPE, np.int32)
    box(truth, (1, 3), (1, 4), (1, 4), 1)
    box(truth, (1, 3), (10, 14), (1, 5), 2)
    box(truth, (5, 9), (10, 18), (10, 18), 3)
    prob = np.where(truth >= 2, 0.9, 0.0)  # node 1 missed
    box(prob, (6, 9), (1, 4), (18, 22), 0.8)  # one false positive
    short = [{1: 3.0, 2: 7.0, 3: 12.0}]
    rep = evaluate_detection([truth], [prob], SPACING, short_axes_mm=short)
    assert set(rep.bins) == set(SIZE_BINS)
    n = {k: v.n_truth for k, v in rep.bins.items()}
    assert n == {"<5mm": 1, "5-10mm": 1, ">=10mm": 1, ">=5mm": 2}
    assert rep.bins["<5mm"].average_recall == 0.0 and rep.bins["<5mm"].object_dice == 0.0
    big = rep.bins[">=10mm"]
    assert big.froc.fp_per_scan.tolist() == [0.0, 1.0]  # the FP counts in every bin
    assert big.average_recall == pytest.approx(1.0) and big.object_dice == pytest.approx(1.0)
    # The bin's voxel Dice: its node (perfect) against its predicted component plus the false positive.
    assert big.voxel_dice == pytest.approx(2 * 256 / (256 + 256 + 36))
    assert rep.overall.average_recall == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="short_axes_mm"):
        evaluate_detection([truth], [prob], SPACING, short_axes_mm=[{1: 3.0}])


def test_size_bins_measured_from_the_truth():
    truth = np.zeros((4, 40, 40), np.int32)
    yy, xx = np.mgrid[:40, :40]
    truth[1:3][:, (yy - 8) ** 2 + (xx - 8) ** 2 <= 1.5**2] = 1  # a 3 x 3 pixel disc: about 3.5 mm
    truth[1:3][:, (yy - 25) ** 2 + (xx - 25) ** 2 <= 6.0**2] = 2  # diameter about 12 mm
    rep = evaluate_detection([truth], [truth * 0.5], (1.0, 1.0, 2.0))
    assert rep.bins["<5mm"].n_truth == 1 and rep.bins[">=10mm"].n_truth == 1 and rep.bins["5-10mm"].n_truth == 0
    assert math.isnan(rep.bins["5-10mm"].average_recall) and math.isnan(rep.bins["5-10mm"].object_dice)
    json.dumps(rep.to_dict(), allow_nan=False)


def test_bad_inputs():
    truth = np.zeros(SHAPE, np.int32)
    prob = np.zeros(SHAPE)
    bad = prob.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"prob_maps\[0\].*NaN"):
        evaluate_detection([truth], [bad], SPACING)
    with pytest.raises(InputError, match="shape"):
        evaluate_detection([truth], [prob[:-1]], SPACING)
    with pytest.raises(InputError, match="spacings"):
        evaluate_detection([truth], [prob], [(1.0, 1.0)])
    with pytest.raises(InputError, match="truth"):
        match_components(truth[0], prob[0])
    with pytest.raises(InputError, match="instance ids"):
        match_components(truth - 1, prob)
    with pytest.raises(UsageError, match="threshold"):
        match_components(truth, prob, threshold=0.0)
