"""Paired tests between two methods evaluated on the same test folds.

McNemar (station level): the 2x2 table counts, over the pooled stations with a known label, whether method A and
method B are correct: [[both correct, A correct / B wrong], [A wrong / B correct, both wrong]]; only the
discordant counts b (A right, B wrong) and c (A wrong, B right) matter. When b + c < ``EXACT_CUTOFF`` (25) the exact
binomial test is used: p = min(1, 2 * P(X <= min(b, c))), X ~ Binomial(b + c, 1/2). Otherwise the chi-square test
with continuity correction: (|b - c| - 1)^2 / (b + c), one degree of freedom.

Paired permutation test (N-stage level): the statistic is metric(A) - metric(B) with metric = N-stage accuracy by
default (or balanced accuracy, quadratic weighted kappa, macro specificity). Under the null hypothesis the two
methods' predictions are exchangeable within a pair, so each permutation swaps A and B for a random half of the
pairs (a pair is a patient: with ``groups`` all scans of a patient swap together). The two-sided p-value is the
share of permutations with |T| >= |T_observed|. With 2^pairs <= n_permutations every swap pattern is enumerated
(exact test); otherwise ``n_permutations`` (default 10000) random patterns from a seeded generator are drawn and
p = (1 + count) / (1 + n_permutations), which never gives p = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from ..errors import UsageError
from ..staging.rules import UNKNOWN
from .metrics import N_CLASSES, ScanPrediction, StageFn, aggregate_per_patient, stage_from_confusion

EXACT_CUTOFF = 25
DEFAULT_PERMUTATIONS = 10000
PERMUTATION_STATISTICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "qwk", "macro_specificity")


@dataclass
class McNemarResult:
    table: list[list[int]]  # [[both correct, A only], [B only, both wrong]]
    b: int  # A correct, B wrong
    c: int  # A wrong, B correct
    statistic: float  # min(b, c) for the exact test, chi-square otherwise
    p_value: float
    method: str  # "exact binomial" | "chi-square with continuity correction"
    exact_cutoff: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_table(table: Any, exact_cutoff: int = EXACT_CUTOFF) -> McNemarResult:
    """McNemar's test on a 2x2 table of paired correctness (see the module docstring for the rule)."""
    t = np.asarray(table)
    if t.shape != (2, 2) or np.any(t < 0) or np.any(t != np.round(t)):
        raise UsageError(f"McNemar table must be 2x2 of non-negative counts, got {t.tolist()}")
    t = t.astype(np.int64)
    b, c = int(t[0, 1]), int(t[1, 0])
    if b + c < exact_cutoff:
        stat = float(min(b, c))
        p = 1.0 if b + c == 0 else float(min(1.0, 2.0 * stats.binom.cdf(min(b, c), b + c, 0.5)))
        method = "exact binomial"
    else:
        stat = (abs(b - c) - 1.0) ** 2 / (b + c)
        p = float(stats.chi2.sf(stat, 1))
        method = "chi-square with continuity correction"
    return McNemarResult(t.tolist(), b, c, float(stat), p, method, exact_cutoff)


def mcnemar(y_true: Any, pred_a: Any, pred_b: Any, exact_cutoff: int = EXACT_CUTOFF) -> McNemarResult:
    """McNemar's test of two methods' binary decisions on the same stations; unknown labels (-1) are left out."""
    t = np.asarray(y_true).ravel()
    a = np.asarray(pred_a).ravel()
    b = np.asarray(pred_b).ravel()
    if not (t.shape == a.shape == b.shape):
        raise UsageError(f"y_true, pred_a and pred_b must have the same length, got {t.size}, {a.size}, {b.size}")
    known = t != UNKNOWN
    ok_a = a[known].astype(bool) == t[known].astype(bool)
    ok_b = b[known].astype(bool) == t[known].astype(bool)
    table = [[int(np.sum(ok_a & ok_b)), int(np.sum(ok_a & ~ok_b))],
             [int(np.sum(~ok_a & ok_b)), int(np.sum(~ok_a & ~ok_b))]]
    return mcnemar_table(table, exact_cutoff)


@dataclass
class PermutationResult:
    statistic: str  # the metric whose difference A - B is tested
    observed: float  # metric(A) - metric(B)
    metric_a: float
    metric_b: float
    p_value: float
    n_permutations: int  # number of swap patterns evaluated
    exact: bool
    n_pairs: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage_metric(y_true: np.ndarray, preds: np.ndarray, statistic: str) -> np.ndarray:
    """The statistic for each row of ``preds`` (R, N), vectorised through confusion matrices."""
    r = preds.shape[0]
    cells = (np.arange(r)[:, None] * N_CLASSES * N_CLASSES + y_true[None, :] * N_CLASSES + preds).ravel()
    cm = np.bincount(cells, minlength=r * N_CLASSES * N_CLASSES).reshape(r, N_CLASSES, N_CLASSES)
    return stage_from_confusion(cm)[statistic]


def paired_permutation_test(
    y_true: Any,
    pred_a: Any,
    pred_b: Any,
    statistic: str = "accuracy",
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    chunk: int = 2000,
) -> PermutationResult:
    """Paired permutation test of the difference in an N-stage metric between methods A and B."""
    if statistic not in PERMUTATION_STATISTICS:
        raise UsageError(f"statistic must be one of {', '.join(PERMUTATION_STATISTICS)}, got {statistic!r}")
    if int(n_permutations) < 1:
        raise UsageError(f"n_permutations must be >= 1, got {n_permutations}")
    t, a, b = (np.asarray(v).ravel() for v in (y_true, pred_a, pred_b))
    if not (t.shape == a.shape == b.shape) or t.size == 0:
        raise UsageError(f"y_true, pred_a and pred_b must be non-empty with equal lengths, "
                         f"got {t.size}, {a.size}, {b.size}")
    for name, v in (("y_true", t), ("pred_a", a), ("pred_b", b)):
        if np.any((v < 0) | (v >= N_CLASSES)) or np.any(v != np.round(v)):
            raise UsageError(f"{name} must hold N-stages 0..3")
    t, a, b = t.astype(np.int64), a.astype(np.int64), b.astype(np.int64)
    if groups is None:
        gidx = np.arange(t.size)
    else:
        if len(groups) != t.size:
            raise UsageError(f"groups must have one entry per prediction ({t.size}), got {len(groups)}")
        _, gidx = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = int(gidx.max()) + 1
    obs = _stage_metric(t, np.stack([a, b]), statistic)
    observed = float(obs[0] - obs[1])
    if np.isnan(observed):
        raise UsageError(f"the statistic {statistic!r} is undefined for these inputs (e.g. kappa with a single "
                            "stage); choose another statistic")
    exact = n_groups < 63 and 2 ** n_groups <= n_permutations
    total = 2 ** n_groups if exact else int(n_permutations)
    rng = np.random.default_rng(seed)
    tol = 1e-12 * max(1.0, abs(observed))
    extreme = 0
    for start in range(0, total, chunk):
        m = min(chunk, total - start)
        if exact:
            codes = np.arange(start, start + m, dtype=np.int64)
            swap = ((codes[:, None] >> np.arange(n_groups)) & 1).astype(bool)
        else:
            swap = rng.random((m, n_groups)) < 0.5
        s = swap[:, gidx]
        pa = np.where(s, b, a)
        pb = np.where(s, a, b)
        diff = _stage_metric(t, pa, statistic) - _stage_metric(t, pb, statistic)
        extreme += int(np.sum(np.abs(np.nan_to_num(diff, nan=0.0)) >= abs(observed) - tol))
    p = extreme / total if exact else (1 + extreme) / (1 + total)
    return PermutationResult(statistic, observed, float(obs[0]), float(obs[1]), float(min(1.0, p)), total, exact,
                             n_groups, int(seed))


# --- comparing two methods' test predictions ------------------------------------------------------------------


@dataclass
class AucDifference:
    """Paired bootstrap of the station ROC AUC difference A - B (patients resampled, both methods together)."""

    auc_a: float
    auc_b: float
    observed: float
    low: float  # 95 % percentile interval
    high: float
    p_value: float  # two-sided: 2 * min(P(diff <= 0), P(diff >= 0)) over the replicates
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_auc_bootstrap(y_true: Any, score_a: Any, score_b: Any, groups: Sequence[Any], n_boot: int = 1000,
                         seed: int = 0) -> AucDifference:
    """Station AUC of A and B on the same stations and their difference, with a paired bootstrap over ``groups``
    (one per station, e.g. the patient): a replicate draws the groups with replacement and weighs every station by
    its group's count, so that the stations of a patient stay together."""
    from ..classifier.metrics import roc_auc

    y = np.asarray(y_true, dtype=int)
    a, b = np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)
    _, g = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    auc_a, auc_b = float(roc_auc(y, a)), float(roc_auc(y, b))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(int(n_boot)):
        w = np.bincount(rng.integers(0, g.max() + 1, g.max() + 1), minlength=g.max() + 1)[g].astype(float)
        da, db = roc_auc(y, a, w), roc_auc(y, b, w)
        if np.isfinite(da) and np.isfinite(db):
            diffs.append(float(da) - float(db))
    d = np.asarray(diffs)
    if d.size == 0:
        return AucDifference(auc_a, auc_b, auc_a - auc_b, float("nan"), float("nan"), float("nan"), 0)
    p = min(1.0, 2.0 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    low, high = np.percentile(d, [2.5, 97.5])
    return AucDifference(auc_a, auc_b, auc_a - auc_b, float(low), float(high), p, int(d.size))


@dataclass
class Comparison:
    """Station-level McNemar and paired AUC bootstrap, and the N-stage permutation test between two methods on the
    same test scans."""

    method_a: str
    method_b: str
    level: str
    mcnemar: McNemarResult
    permutation: PermutationResult
    auc: AucDifference | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method_a": self.method_a, "method_b": self.method_b, "level": self.level,
                "mcnemar": self.mcnemar.to_dict(), "permutation": self.permutation.to_dict(),
                "auc": None if self.auc is None else self.auc.to_dict()}


def compare_methods(
    scans_a: Sequence[ScanPrediction],
    scans_b: Sequence[ScanPrediction],
    method_a: str = "A",
    method_b: str = "B",
    level: str = "patient",
    threshold: float = 0.5,
    statistic: str = "accuracy",
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    exact_cutoff: int = EXACT_CUTOFF,
    stage_fn_a: StageFn | None = None,
    stage_fn_b: StageFn | None = None,
    n_boot: int = 1000,
) -> Comparison:
    """Test two methods on the same test scans of the same folds (paired by (patient, scan, fold)).

    ``level`` "patient" first combines each patient's scans (metrics.aggregate_per_patient); with "scan" all scans
    of a patient still swap together in the permutation test. ``stage_fn_a``/``stage_fn_b``: as ``stage_fn`` of
    aggregate_per_patient, for methods whose N-stage comes from rules applied to the station decisions. ``n_boot``
    replicates of the paired station-AUC bootstrap (0: none).
    """
    if level not in ("scan", "patient"):
        raise UsageError(f"level must be scan or patient, got {level!r}")
    keyed_a = {(s.patient_id, s.scan_id, s.fold): s for s in scans_a}
    keyed_b = {(s.patient_id, s.scan_id, s.fold): s for s in scans_b}
    if len(keyed_a) != len(scans_a) or len(keyed_b) != len(scans_b):
        raise UsageError("a method lists the same (patient, scan, fold) twice")
    if set(keyed_a) != set(keyed_b):
        only_a = sorted(set(keyed_a) - set(keyed_b), key=str)[:3]
        only_b = sorted(set(keyed_b) - set(keyed_a), key=str)[:3]
        raise UsageError(f"{method_a} and {method_b} were not evaluated on the same test scans and folds "
                         f"(only {method_a}: {only_a}; only {method_b}: {only_b})")
    keys = sorted(keyed_a, key=str)
    sa = [keyed_a[k] for k in keys]
    sb = [keyed_b[k] for k in keys]
    for x, y in zip(sa, sb, strict=True):
        if x.n_true != y.n_true or not np.array_equal(x.station_true, y.station_true):
            raise UsageError(f"scan {x.scan_id!r}: {method_a} and {method_b} have different reference labels")
    if level == "patient":
        sa = aggregate_per_patient(sa, threshold=threshold, stage_fn=stage_fn_a)
        sb = aggregate_per_patient(sb, threshold=threshold, stage_fn=stage_fn_b)
    truth = np.concatenate([s.station_true for s in sa])
    mc = mcnemar(truth, np.concatenate([s.predicted_positive(threshold) for s in sa]),
                 np.concatenate([s.predicted_positive(threshold) for s in sb]), exact_cutoff)
    perm = paired_permutation_test([s.n_true for s in sa], [s.n_pred for s in sa], [s.n_pred for s in sb],
                                   statistic=statistic, n_permutations=n_permutations, seed=seed,
                                   groups=[s.patient_id for s in sa])
    auc = None
    if n_boot:
        known = truth >= 0
        groups = np.concatenate([[s.patient_id] * len(s.station_true) for s in sa])[known]
        auc = paired_auc_bootstrap(truth[known], np.concatenate([s.station_prob for s in sa])[known],
                                   np.concatenate([s.station_prob for s in sb])[known], groups, n_boot, seed)
    return Comparison(method_a, method_b, level, mc, perm, auc)
