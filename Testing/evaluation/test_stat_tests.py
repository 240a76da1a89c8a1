"""McNemar against statsmodels, the paired permutation test against scipy, and the two-method comparison."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from LymphNodeStagingLib.errors import UsageError
from LymphNodeStagingLib.evaluation.metrics import ScanPrediction, stage_metrics
from LymphNodeStagingLib.evaluation.stat_tests import (
    EXACT_CUTOFF,
    compare_methods,
    mcnemar,
    mcnemar_table,
    paired_permutation_test,
)


@pytest.mark.parametrize("table", [
    [[50, 3], [9, 20]],  # b + c = 12: exact
    [[10, 0], [0, 5]],  # no discordant pair: p = 1
    [[40, 12], [12, 3]],  # b + c = 24 < 25, symmetric: exact p = 1
    [[400, 30], [12, 80]],  # b + c = 42: chi-square with correction
    [[100, 25], [0, 3]],  # b + c = 25: chi-square (cut-off reached)
])
def test_mcnemar_matches_statsmodels(table):
    r = mcnemar_table(table)
    b, c = table[0][1], table[1][0]
    exact = b + c < EXACT_CUTOFF
    ref = sm_mcnemar(np.array(table), exact=exact, correction=True)
    assert r.method == ("exact binomial" if exact else "chi-square with continuity correction")
    assert (r.b, r.c) == (b, c)
    assert r.p_value == pytest.approx(min(1.0, ref.pvalue), rel=1e-10)
    if b + c > 0:
        assert r.statistic == pytest.approx(ref.statistic, rel=1e-10)


def test_mcnemar_from_station_decisions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    pa = np.where(rng.random(500) < 0.85, y, 1 - y)
    pb = np.where(rng.random(500) < 0.75, y, 1 - y)
    y_unknown = y.copy()
    y_unknown[:20] = -1  # unknown labels are left out
    r = mcnemar(y_unknown, pa, pb)
    ok_a, ok_b = (pa == y)[20:], (pb == y)[20:]
    table = [[np.sum(ok_a & ok_b), np.sum(ok_a & ~ok_b)], [np.sum(~ok_a & ok_b), np.sum(~ok_a & ~ok_b)]]
    assert r.table == [[int(v) for v in row] for row in table]
    ref = sm_mcnemar(np.array(table), exact=False, correction=True)
    assert r.p_value == pytest.approx(ref.pvalue) and r.p_value < 0.05
    with pytest.raises(UsageError, match="same length"):
        mcnemar([0, 1], [0], [1, 1])
    with pytest.raises(UsageError, match="2x2"):
        mcnemar_table([[1, 2, 3]])


def _scipy_paired(t, a, b, metric, n_resamples):
    def statistic(x, y):
        return getattr(stage_metrics(t, x), metric) - getattr(stage_metrics(t, y), metric)

    return stats.permutation_test((np.asarray(a), np.asarray(b)), statistic, permutation_type="samples",
                                  n_resamples=n_resamples, alternative="two-sided", vectorized=False)


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "qwk"])
def test_permutation_exact_matches_scipy(metric):
    rng = np.random.default_rng(4)
    t = rng.integers(0, 4, 10)
    a = np.where(rng.random(10) < 0.8, t, rng.integers(0, 4, 10))
    b = np.where(rng.random(10) < 0.4, t, rng.integers(0, 4, 10))
    r = paired_permutation_test(t, a, b, statistic=metric, n_permutations=5000)
    ref = _scipy_paired(t, a, b, metric, np.inf)  # scipy enumerates all 2^10 swaps too
    assert r.exact and r.n_permutations == 1024 and r.n_pairs == 10
    assert r.observed == pytest.approx(ref.statistic)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_permutation_monte_carlo_close_to_scipy_and_seeded():
    rng = np.random.default_rng(5)
    t = rng.integers(0, 4, 80)
    a = np.where(rng.random(80) < 0.75, t, rng.integers(0, 4, 80))
    b = np.where(rng.random(80) < 0.6, t, rng.integers(0, 4, 80))
    r = paired_permutation_test(t, a, b, n_permutations=4000, seed=1)
    assert not r.exact and r.n_permutations == 4000
    assert r == paired_permutation_test(t, a, b, n_permutations=4000, seed=1)
    ref = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x == t, axis=axis) - np.mean(y == t, axis=axis),
                                 permutation_type="samples", n_resamples=9999, vectorized=True,
                                 random_state=np.random.default_rng(0))
    assert abs(r.p_value - ref.pvalue) < 0.02
    # difference in accuracy: exact by enumerating the discordant pairs (sign test on the correctness difference)
    d = (a == t).astype(int) - (b == t).astype(int)
    n_disc, k = int(np.sum(d != 0)), int(np.sum(d > 0))
    sign_p = stats.binomtest(k, n_disc, 0.5).pvalue
    assert abs(r.p_value - sign_p) < 0.02
    # identical methods: no evidence of a difference
    assert paired_permutation_test(t, a, a, n_permutations=200).p_value == 1.0


def test_permutation_groups_swap_together_and_errors():
    t = [0, 0, 1, 1, 2, 2]
    a = [0, 0, 1, 1, 2, 2]
    b = [1, 1, 1, 0, 2, 2]
    # two scans per patient: 3 pairs -> 8 swap patterns. Correctness differences per patient: p +2, q +1, r 0;
    # T = (+-2 +-1) / 6, |T| >= 3/6 in half of the patterns
    r = paired_permutation_test(t, a, b, groups=["p", "p", "q", "q", "r", "r"], n_permutations=100)
    assert r.exact and r.n_pairs == 3 and r.n_permutations == 8
    assert r.observed == pytest.approx(3 / 6)
    assert r.p_value == pytest.approx(4 / 8)
    # scans swapped one by one: three +1 differences, |T| = 3/6 only when all agree: 2 of 8 sign patterns
    r = paired_permutation_test(t, a, b, n_permutations=100)
    assert r.n_permutations == 64 and r.p_value == pytest.approx(0.25)
    with pytest.raises(UsageError, match="statistic must be one of"):
        paired_permutation_test(t, a, b, statistic="auc")
    with pytest.raises(UsageError, match="N-stages 0..3"):
        paired_permutation_test([0, 5], [0, 1], [0, 1])
    with pytest.raises(UsageError, match="undefined"):
        paired_permutation_test([2, 2], [2, 2], [2, 2], statistic="qwk")


def _method(seed: int, quality: float, n: int = 30):
    rng = np.random.default_rng(100)  # same reference labels for both methods
    truth = (rng.random((n, 17)) < 0.15).astype(int)
    n_true = rng.integers(0, 4, n)
    mrng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prob = np.clip(np.where(truth[i] == 1, quality, 1 - quality) + mrng.normal(0, 0.25, 17), 0, 1)
        n_pred = int(n_true[i]) if mrng.random() < quality else int(mrng.integers(0, 4))
        out.append(ScanPrediction(f"P{i}", f"P{i}_s", truth[i], prob, int(n_true[i]), n_pred, fold=i % 2))
    return out


def test_compare_methods_on_the_same_folds():
    good, poor = _method(1, 0.9), _method(2, 0.55)
    cmp = compare_methods(good, poor, "TS1", "threshold", n_permutations=2000, seed=3)
    assert cmp.mcnemar.p_value < 0.05 and cmp.mcnemar.b > cmp.mcnemar.c
    assert cmp.permutation.observed > 0 and cmp.permutation.p_value < 0.05
    assert cmp.to_dict()["permutation"]["n_permutations"] == 2000
    same = compare_methods(good, list(reversed(good)), n_permutations=500)
    assert same.mcnemar.p_value == 1.0 and same.permutation.p_value == 1.0
    with pytest.raises(UsageError, match="not evaluated on the same test scans and folds"):
        compare_methods(good, poor[:-1])
    moved = [ScanPrediction(s.patient_id, s.scan_id, s.station_true, s.station_prob, s.n_true, s.n_pred,
                            fold=(s.fold + 1) % 2) for s in poor]
    with pytest.raises(UsageError, match="same test scans and folds"):
        compare_methods(good, moved)


def test_paired_auc_bootstrap_keeps_patients_together_and_finds_a_real_difference():
    from LymphNodeStagingLib.evaluation.stat_tests import paired_auc_bootstrap

    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), 10)
    y = (rng.random(600) < 0.2).astype(int)
    good = y + rng.normal(0, 0.5, 600)
    poor = y + rng.normal(0, 2.0, 600)
    res = paired_auc_bootstrap(y, good, poor, patients, n_boot=300, seed=1)
    assert res.auc_a > res.auc_b and res.observed == pytest.approx(res.auc_a - res.auc_b)
    assert 0 < res.low < res.observed < res.high and res.p_value < 0.01 and res.n_boot == 300
    same = paired_auc_bootstrap(y, good, good, patients, n_boot=100, seed=1)
    assert same.observed == 0 and same.low == same.high == 0 and same.p_value == 1.0
    again = paired_auc_bootstrap(y, good, poor, patients, n_boot=300, seed=1)
    assert (again.low, again.high) == (res.low, res.high)  # seeded
