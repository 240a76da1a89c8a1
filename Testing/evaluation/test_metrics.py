"""Station-level and N-stage metrics on hand-computed confusion matrices, checked against scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    recall_score,
    roc_auc_score,
)
from sklearn.metrics import (
    confusion_matrix as sk_confusion_matrix,
)

from LymphNodeStagingLib.classifier.metrics import roc_auc, tune_threshold
from LymphNodeStagingLib.errors import UsageError
from LymphNodeStagingLib.evaluation.metrics import (
    ScanPrediction,
    aggregate_per_patient,
    confusion_matrix,
    evaluate_method,
    evaluate_scans,
    markdown_table,
    mean_sd,
    stage_metrics,
    station_metrics,
    summarize_folds,
)


def sk_quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# --- station level ------------------------------------------------------------------------------------------------


def test_station_metrics_hand_computed_and_unknown_labels_left_out():
    y = [1, 1, 1, 0, 0, 0, 0, 0, -1]
    pred = [1, 1, 0, 1, 0, 0, 0, 0, 1]
    m = station_metrics(y, y_pred=pred)
    # TP 2, FN 1, FP 1, TN 4 (the unknown station is not counted)
    assert (m.tp, m.fn, m.fp, m.tn, m.n, m.n_positive) == (2, 1, 1, 4, 8, 3)
    assert m.accuracy == pytest.approx(6 / 8)
    assert m.sensitivity == pytest.approx(2 / 3)
    assert m.specificity == pytest.approx(4 / 5)
    assert m.balanced_accuracy == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert math.isnan(m.auc)  # no probabilities -> no AUC, never one from hard labels
    yk, pk = y[:-1], pred[:-1]
    assert m.accuracy == pytest.approx(accuracy_score(yk, pk))
    assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(yk, pk))
    assert m.sensitivity == pytest.approx(recall_score(yk, pk, pos_label=1))
    assert m.specificity == pytest.approx(recall_score(yk, pk, pos_label=0))


def test_station_absent_class_is_undefined_not_one():
    # no positive station: sensitivity undefined (the original code reported 1.0)
    m = station_metrics([0, 0, 0, 0], prob=[0.1, 0.7, 0.2, 0.3])
    assert math.isnan(m.sensitivity)
    assert m.specificity == pytest.approx(3 / 4)
    assert m.balanced_accuracy == pytest.approx(3 / 4)  # mean over the classes present, as scikit-learn
    assert m.balanced_accuracy == pytest.approx(sk_quiet(balanced_accuracy_score, [0, 0, 0, 0], [0, 1, 0, 0]))
    assert math.isnan(m.auc)
    # only positives: specificity undefined
    m = station_metrics([1, 1], y_pred=[1, 0])
    assert math.isnan(m.specificity) and m.sensitivity == pytest.approx(0.5)
    assert m.to_dict()["specificity"] is None  # JSON: null, not NaN


def test_auc_from_probabilities_with_ties_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    prob = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.2, 300), 0, 1), 1)  # rounded: many ties
    m = station_metrics(y, prob=prob)
    assert m.auc == pytest.approx(roc_auc_score(y, prob), abs=1e-12)
    w = rng.integers(0, 3, 300).astype(float)
    assert roc_auc(y, prob, w) == pytest.approx(roc_auc_score(y, prob, sample_weight=w), abs=1e-12)
    # a perfect ranking with a bad threshold: AUC 1 although the hard labels are half wrong
    m = station_metrics([0, 0, 1, 1], prob=[0.6, 0.7, 0.8, 0.9])
    assert m.auc == 1.0 and m.balanced_accuracy == 0.5


def test_best_threshold_by_balanced_accuracy():
    suv = [1.0, 2.0, 2.8, 3.2, 4.4, 5.0, 6.0, 3.1]
    y = [0, 0, 0, 1, 0, 1, 1, -1]
    # t = 3: positives 3.2, 4.4, 5, 6 -> sens 1, spec 3/4 -> 0.875; t = 4.5: sens 2/3, spec 1 -> 0.833
    grid = [2.5, 3, 3.5, 4, 4.5, 5, 5.5]
    t, value = tune_threshold(y, suv, grid, strict=True, prefer=2.5)
    assert t == 3.0 and value == pytest.approx(0.875)
    assert tune_threshold([0, 1], [3.0, 3.0], [3.0]) == (3.0, 0.5)
    assert tune_threshold([0, 1, 1], [1, 2, 3], [0.5, 1.5, 1.6], strict=True, prefer=0.5)[0] == 1.5  # tie -> prefer


# --- N-stage level --------------------------------------------------------------------------------------------------

#                  truth N0 x4        N1 x2   N2 x3     N3
T_HAND = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
P_HAND = np.array([0, 0, 0, 1, 1, 2, 2, 2, 0, 1])
CM_HAND = [[3, 1, 0, 0],
           [0, 1, 1, 0],
           [1, 0, 2, 0],
           [0, 1, 0, 0]]


def test_stage_metrics_hand_computed_confusion_matrix():
    m = stage_metrics(T_HAND, P_HAND)
    assert m.confusion == CM_HAND
    assert np.array_equal(confusion_matrix(T_HAND, P_HAND), sk_confusion_matrix(T_HAND, P_HAND, labels=[0, 1, 2, 3]))
    assert m.accuracy == pytest.approx(6 / 10)
    sens = [3 / 4, 1 / 2, 2 / 3, 0 / 1]
    spec = [5 / 6, 6 / 8, 6 / 7, 9 / 9]  # TN / (n - row): N0 FP 1, N1 FP 2, N2 FP 1, N3 FP 0
    assert m.sensitivity_per_stage == pytest.approx(sens)
    assert m.specificity_per_stage == pytest.approx(spec)
    assert m.balanced_accuracy == pytest.approx(np.mean(sens))
    assert m.macro_sensitivity == pytest.approx(np.mean(sens))
    assert m.macro_specificity == pytest.approx(np.mean(spec))
    assert m.severe_error_rate == pytest.approx(2 / 10)  # N2 -> N0 and N3 -> N1
    assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(T_HAND, P_HAND))
    assert m.macro_sensitivity == pytest.approx(recall_score(T_HAND, P_HAND, average="macro"))
    # quadratic weighted kappa by hand: weights (i-j)^2/9, expected = outer(row sums, column sums) / n
    rows, cols = np.sum(CM_HAND, axis=1), np.sum(CM_HAND, axis=0)
    w = (np.subtract.outer(np.arange(4), np.arange(4)) ** 2) / 9
    kappa = 1 - (w * CM_HAND).sum() / (w * np.outer(rows, cols) / 10).sum()
    assert m.qwk == pytest.approx(kappa)
    assert m.qwk == pytest.approx(cohen_kappa_score(T_HAND, P_HAND, weights="quadratic", labels=[0, 1, 2, 3]))


def test_stage_absent_class_cases_of_the_method_spec():
    # N3 absent from reference and prediction: the original counted sens = spec = 1 for it
    t, p = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    m = stage_metrics(t, p)
    assert m.macro_sensitivity == pytest.approx((0.5 + 1 + 0.5) / 3)  # not (0.5+1+0.5+1)/4 = 0.75
    # N0: 1 false N0 of 4 negatives; N1: 1 false N1 of 4; N2: none of 4
    assert m.specificity_per_stage[:3] == pytest.approx([3 / 4, 3 / 4, 4 / 4])
    assert m.macro_specificity == pytest.approx((3 / 4 + 3 / 4 + 4 / 4) / 3)  # not (... + 1) / 4 = 0.875
    assert math.isnan(m.sensitivity_per_stage[3])
    assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(t, p))
    assert m.macro_sensitivity == pytest.approx(recall_score(t, p, labels=[0, 1, 2], average="macro"))
    # a stage predicted but absent from the reference (N3): its undefined sensitivity is dropped
    t, p = [0, 0, 1, 1], [0, 3, 1, 1]
    m = stage_metrics(t, p)
    assert m.macro_sensitivity == pytest.approx(0.75)
    assert m.balanced_accuracy == pytest.approx(sk_quiet(balanced_accuracy_score, t, p))
    assert m.specificity_per_stage[3] == pytest.approx(3 / 4)  # defined, but N3 is not in the macro average
    assert m.macro_specificity == pytest.approx(1.0)
    assert m.severe_error_rate == pytest.approx(1 / 4)
    # a single reference stage: specificity undefined, kappa undefined -> NaN, never 1.0
    m = stage_metrics([2, 2, 2], [2, 1, 2])
    assert math.isnan(m.macro_specificity)
    assert m.macro_sensitivity == pytest.approx(2 / 3)
    assert math.isnan(stage_metrics([2, 2], [2, 2]).qwk)
    # perfect agreement
    m = stage_metrics([0, 1, 2, 3], [0, 1, 2, 3])
    assert (m.accuracy, m.qwk, m.macro_specificity, m.severe_error_rate) == (1.0, 1.0, 1.0, 0.0)


def test_qwk_against_sklearn_random_and_argument_order():
    rng = np.random.default_rng(3)
    for _ in range(5):
        t = rng.integers(0, 4, 50)
        p = np.clip(t + rng.integers(-2, 3, 50), 0, 3)
        assert stage_metrics(t, p).qwk == pytest.approx(
            cohen_kappa_score(t, p, weights="quadratic", labels=[0, 1, 2, 3]))
        # reference first: swapping the arguments changes balanced accuracy (the original swapped them)
        assert stage_metrics(t, p).balanced_accuracy == pytest.approx(balanced_accuracy_score(t, p))
    t, p = [0, 0, 0, 1, 2], [0, 1, 1, 1, 1]
    assert stage_metrics(t, p).balanced_accuracy == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert stage_metrics(p, t).balanced_accuracy == pytest.approx((1 + 1 / 4) / 2)


def test_bad_inputs_raise():
    with pytest.raises(UsageError, match="y_pred must hold integers 0..3"):
        stage_metrics([0, 1], [0, 4])
    with pytest.raises(UsageError, match="same length"):
        stage_metrics([0, 1], [0])
    with pytest.raises(UsageError, match="station labels must be 0, 1 or -1"):
        station_metrics([0, 2], y_pred=[0, 1])
    with pytest.raises(UsageError, match="n_pred must be 0..3"):
        ScanPrediction("p", "s", [0], [0.1], 0, 7)


# --- per scan / per patient, bootstrap, folds ---------------------------------------------------------------------


def scan(pid, sid, truth, prob, n_true, n_pred, fold=0, **kw):
    return ScanPrediction(pid, sid, np.array(truth), np.array(prob, dtype=float), n_true, n_pred, fold=fold, **kw)


def test_per_patient_aggregation_does_not_over_weight_patients_with_many_scans():
    scans = [
        scan("A", "a1", [1, 0], [0.9, 0.1], 2, 0),  # patient A: three scans, all N-stage errors
        scan("A", "a2", [1, 0], [0.7, 0.2], 2, 0),
        scan("A", "a3", [1, -1], [0.2, 0.2], 2, 1),
        scan("B", "b1", [0, 0], [0.1, 0.6], 0, 0),
        scan("C", "c1", [1, 1], [0.8, 0.9], 1, 1),
    ]
    per_scan = evaluate_scans(scans, level="scan", n_boot=0)
    per_patient = evaluate_scans(scans, level="patient", n_boot=0)
    assert per_scan.stage.accuracy == pytest.approx(2 / 5)
    assert per_patient.stage.accuracy == pytest.approx(2 / 3)
    assert (per_scan.n_scans, per_scan.n_patients, per_patient.n_scans, per_patient.n_patients) == (5, 3, 5, 3)
    # A's stations: mean prob (0.6, 0.1667) -> (pos, neg); A's N-stage: most frequent prediction (N0)
    agg = aggregate_per_patient(scans)
    assert agg[0].station_true.tolist() == [1, 0]
    assert agg[0].station_prob == pytest.approx([0.6, 0.5 / 3])
    assert agg[0].n_pred == 0
    assert per_patient.station.n == 6 and per_patient.station.tp == 3 and per_patient.station.fp == 1
    # a rule applied to the aggregated station decisions decides the patient's N-stage
    agg = aggregate_per_patient(scans, stage_fn=lambda pid, pos: 2 if pos[0] else 0)
    assert agg[0].n_pred == 2
    # ties between predicted stages go to the higher stage; mean stage probabilities win over votes
    tie = [scan("D", "d1", [0], [0.1], 1, 1), scan("D", "d2", [0], [0.1], 1, 2)]
    assert aggregate_per_patient(tie)[0].n_pred == 2
    tie = [scan("D", "d1", [0], [0.1], 1, 1, n_prob=[0, 0.9, 0.1, 0]),
           scan("D", "d2", [0], [0.1], 1, 2, n_prob=[0, 0.4, 0.6, 0])]
    assert aggregate_per_patient(tie)[0].n_pred == 1
    with pytest.raises(UsageError, match="patient 'E'.*different reference N-stages"):
        aggregate_per_patient([scan("E", "e1", [0], [0.1], 1, 1), scan("E", "e2", [0], [0.1], 2, 1)])
    with pytest.raises(UsageError, match="patient 'E'.*disagree on the label"):
        aggregate_per_patient([scan("E", "e1", [0], [0.1], 1, 1), scan("E", "e2", [1], [0.1], 1, 1)])


def random_scans(n_patients=40, seed=0, folds=2):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_patients):
        n_true = int(rng.integers(0, 4))
        truth = (rng.random(17) < 0.15).astype(int)
        prob = np.clip(0.5 * truth + rng.normal(0.25, 0.2, 17), 0, 1)
        for j in range(1 + (i % 3 == 0)):
            n_pred = int(np.clip(n_true + rng.integers(-1, 2), 0, 3))
            out.append(scan(f"P{i}", f"P{i}_s{j}", truth, prob, n_true, n_pred, fold=i % folds))
    return out


def test_bootstrap_matches_a_direct_resampling_loop_and_is_seeded():
    scans = random_scans(25, seed=1)
    ev = evaluate_scans(scans, level="scan", n_boot=200, seed=9)
    again = evaluate_scans(scans, level="scan", n_boot=200, seed=9)
    assert ev.to_dict() == again.to_dict()
    assert evaluate_scans(scans, level="scan", n_boot=200, seed=10).ci["stage.accuracy"] != ev.ci["stage.accuracy"]
    # reproduce the first replicates by resampling patients explicitly (same generator, same draws)
    pids = list(dict.fromkeys(s.patient_id for s in scans))
    draws = np.random.default_rng(9).multinomial(len(pids), np.full(len(pids), 1 / len(pids)), size=200)
    acc, auc, kappa = [], [], []
    for d in draws:
        chosen = [s for s in scans for _ in range(d[pids.index(s.patient_id)])]
        t = np.concatenate([s.station_true for s in chosen])
        p = np.concatenate([s.station_prob for s in chosen])
        acc.append(stage_metrics([s.n_true for s in chosen], [s.n_pred for s in chosen]).accuracy)
        auc.append(roc_auc_score(t, p))
        kappa.append(cohen_kappa_score([s.n_true for s in chosen], [s.n_pred for s in chosen],
                                       weights="quadratic", labels=[0, 1, 2, 3]))
    assert ev.ci["stage.accuracy"].low == pytest.approx(np.quantile(acc, 0.025))
    assert ev.ci["stage.accuracy"].high == pytest.approx(np.quantile(acc, 0.975))
    assert ev.ci["station.auc"].low == pytest.approx(np.quantile(auc, 0.025))
    assert ev.ci["stage.qwk"].high == pytest.approx(np.quantile(kappa, 0.975))
    for k, iv in ev.ci.items():
        assert iv.low <= iv.estimate + 1e-9 <= iv.high + 2e-9 or k.endswith("severe_error_rate"), k
        assert iv.n_valid == 200 and iv.level == 0.95


def test_bootstrap_undefined_replicates_are_dropped_and_counted():
    # one patient holds the only positive stations: replicates without it have no sensitivity
    scans = [scan("pos", "s", [1, 1], [0.9, 0.4], 1, 1)] + [scan(f"n{i}", "s", [0, 0], [0.2, 0.1], 0, 0)
                                                            for i in range(9)]
    ev = evaluate_scans(scans, level="patient", n_boot=300, seed=0)
    iv = ev.ci["station.sensitivity"]
    assert 0 < iv.n_valid < 300  # about 1 - 0.9^10 = 65 % of the replicates draw the positive patient
    assert ev.ci["station.specificity"].n_valid == 300


def test_mean_sd_over_folds_and_evaluate_method():
    s = mean_sd([0.8, 0.9, float("nan")])
    assert (s.mean, s.n) == (pytest.approx(0.85), 2)
    assert s.sd == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert s.format() == "0.85 ± 0.07"
    assert mean_sd([]).format() == "n/a"
    summary = summarize_folds([{"a": 1.0}, {"a": 3.0}])
    assert summary["a"].mean == 2.0 and summary["a"].sd == pytest.approx(math.sqrt(2))
    scans = random_scans(30, seed=2, folds=3)
    res = evaluate_method("TS1", scans, n_boot=100, seed=0)
    assert res.folds == [0, 1, 2]
    for level in ("scan", "patient"):
        assert len(res.per_fold[level]) == 3
        accs = [e.stage.accuracy for e in res.per_fold[level]]
        assert res.summary[level]["stage.accuracy"].mean == pytest.approx(np.mean(accs))
        assert res.summary[level]["station.auc"].n == 3
        assert res.pooled[level].ci["station.balanced_accuracy"].n_valid == 100
    assert res.pooled["scan"].n_scans > res.pooled["patient"].n_patients == 30
    d = res.to_dict()
    assert set(d["summary"]["patient"]) >= {"station.accuracy", "station.auc", "stage.qwk", "stage.severe_error_rate"}
    table = markdown_table([res, evaluate_method("B", random_scans(30, seed=3, folds=3), n_boot=0)])
    lines = table.splitlines()
    assert lines[0].startswith("| method | LNS Acc | LNS BalAcc | LNS Sens | LNS Spec | LNS AUC | N Acc")
    assert len(lines) == 4 and lines[2].startswith("| TS1 | ") and lines[3].startswith("| B | ")
    assert res.summary["patient"]["stage.accuracy"].format() in lines[2]
    with pytest.raises(UsageError, match="without a fold"):
        evaluate_method("x", [scan("p", "s", [0], [0.1], 0, 0, fold=None)])


def test_evaluation_run_as_a_data_frame(tmp_path):
    from LymphNodeStagingLib.evaluation.crossval import EvaluationRun

    res = evaluate_method("TS1", random_scans(20, seed=4, folds=2), n_boot=0)
    run = EvaluationRun(tmp_path, ["TS1"], {"TS1": res}, [], {}, {}, 0.0, 20, 20)
    frame = run.to_frame("patient")
    assert list(frame.index) == ["TS1"]
    assert frame.loc["TS1", "stage.accuracy_mean"] == pytest.approx(res.summary["patient"]["stage.accuracy"].mean)
