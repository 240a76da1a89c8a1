"""The one balanced accuracy and the one threshold search (classifier/metrics.py), against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from LymphNodeStagingLib.classifier.metrics import (
    balanced_accuracy,
    binary_from_counts,
    binary_metrics,
    mean_recall,
    roc_auc,
    tune_threshold,
)


def test_balanced_accuracy_matches_sklearn_for_two_and_four_classes():
    rng = np.random.default_rng(0)
    for k in (2, 4):
        t, p = rng.integers(0, k, 200), rng.integers(0, k, 200)
        assert balanced_accuracy(t, p) == pytest.approx(balanced_accuracy_score(t, p))
    assert balanced_accuracy([1, 1, 0, 0], [1, 0, 0, 0]) == 0.75


def test_absent_class_is_left_out_not_counted_as_one():
    # only positives in the reference: the recall of the positives alone (sklearn warns and does the same)
    assert balanced_accuracy([1, 1, 1, 1], [1, 0, 0, 0]) == 0.25
    m = binary_from_counts(1, 0, 0, 3)  # tp fp tn fn
    assert float(m["balanced_accuracy"]) == 0.25 and np.isnan(m["specificity"])
    # N-stage: stages absent from the reference do not count (N3 predicted but never true)
    cm = np.array([[2, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert float(mean_recall(cm)) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert np.isnan(balanced_accuracy([], []))
    assert np.isnan(float(mean_recall(np.zeros((2, 2)))))


def test_binary_metrics_and_auc():
    y = np.array([0, 0, 1, 1, 1])
    prob = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    m = binary_metrics(y, prob, 0.5)
    assert (m["sensitivity"], m["specificity"], m["n"]) == (pytest.approx(2 / 3), 0.5, 5)
    assert roc_auc(y, prob) == pytest.approx(roc_auc_score(y, prob))


def test_tune_threshold_midpoints_ties_and_absent_class():
    y = np.array([0, 0, 1, 1])
    t, value = tune_threshold(y, np.array([0.1, 0.2, 0.3, 0.4]))
    assert 0.2 < t <= 0.3 and value == 1.0
    # every midpoint between 0.2 and 0.3 separates perfectly; a tie goes to the candidate nearest to prefer
    assert tune_threshold([0, 1], [0.2, 0.8], prefer=0.5) == (0.5, 1.0)
    # a grid (the SUVmax baseline): ties go to the smallest when prefer is the grid's minimum
    assert tune_threshold([0, 1, 1], [1, 2, 3], [0.5, 1.5, 1.6], strict=True, prefer=0.5)[0] == 1.5
    # unknown labels (-1) are left out
    assert tune_threshold([0, 1, -1], [1.0, 3.0, 10.0], [2.0, 5.0])[0] == 2.0
    # one class only: no threshold is better than another -> (prefer, nan)
    t, value = tune_threshold([1, 1, 1], [0.2, 0.4, 0.9])
    assert t == 0.5 and np.isnan(value)
    t, value = tune_threshold([0, 0], [1.0, 2.0], [1.5, 3.0], prefer=1.5)
    assert t == 1.5 and np.isnan(value)
